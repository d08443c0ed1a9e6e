"""Thin DVC stage entry points: ``python -m stages.<name>``; the work lives in semilens."""
