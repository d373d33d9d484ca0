"""Tests of sdstack.generate."""
