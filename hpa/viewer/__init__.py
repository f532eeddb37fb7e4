"""The cell viewer of stage 08: every cell's answer drawn on its field, and a page to browse them."""
