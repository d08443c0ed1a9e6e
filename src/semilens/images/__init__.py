"""SEM/TEM image stages: synthesis, ingest, measurement, annotation and splitting."""
