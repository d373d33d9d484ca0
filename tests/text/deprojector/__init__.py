"""Tests of the CLIP text deprojector (sdstack.text.deprojector)."""
