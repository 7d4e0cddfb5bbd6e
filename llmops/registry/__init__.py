"""The model registry (GTO tags: versions, stages, lineage, reviews) and the model cards of its versions."""
