"""TFDS builders shipped with jaxlm; each writes array_record that `tfds.data_source` reads."""
