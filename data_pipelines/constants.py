"""Constants shared by the data layer and the tasks on top of it, so that neither copies the other's."""

# the label of a padding sample (validation under data parallelism pads the last batches so every rank runs the
# same number of steps); F.cross_entropy's default ignore_index, so losses and metrics skip it without arguments
IGNORE_INDEX = -100
