"""hmacfs: a signed-URL file upload/download server (XEP-0363 external upload service).

Standard library only; see README.md for the architecture and docs/ for operators.
"""

__version__ = "0.1.0"
