"""Text and token windows: the bundled corpora, user calibration files. Imports core."""
