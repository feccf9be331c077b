"""One module per adaptation method; see ``benchmarks/adaptation.py``."""
