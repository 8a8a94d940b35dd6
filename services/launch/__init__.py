"""Start every service as a local process (`aligner up`), the embedded default deployment."""
