"""affseg: UniCL-AffSeg and its sweep platform."""
