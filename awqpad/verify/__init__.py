"""Stage 6, verify: proving an OUT is what `pad` claims (structure and provenance, bytes, fills and
dequantized zeros, the fp64 TP-sharded MLP and attention simulations), as a list of independent checks."""
