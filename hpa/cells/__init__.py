"""Everything per cell: the cell table, the isolated-cell view, crops, pseudo-label rules, targets, confidences."""
