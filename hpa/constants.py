"""Names and numbers shared by every stage."""

#: Channel order of a field of view everywhere in this package: (4, H, W) arrays are
#: red (microtubules), green (protein of interest), blue (nucleus), yellow (ER).
CHANNELS = ("red", "green", "blue", "yellow")

#: The 19 classes of the HPA Single Cell Classification competition (2021).
CLASS_NAMES = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES = len(CLASS_NAMES)
#: Index of the Negative class: a cell (or image) with none of classes 0..17.
NEGATIVE = 18

#: IoU at which a predicted cell mask matches a true one (competition rule).
IOU_THRESHOLD = 0.6

#: File extensions accepted for channel images, in the order they are looked for.
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

#: Column names of per-class tables: probabilities ``p0..p18`` (image and cell models) and
#: training targets ``t0..t18`` (cell labels).
PROB_COLS = [f"p{c}" for c in range(NUM_CLASSES)]
TARGET_COLS = [f"t{c}" for c in range(NUM_CLASSES)]
