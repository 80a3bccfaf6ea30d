"""Stage 2, checkpoint: what the files are (safetensors headers, config.json, the architecture table, one
module per quantization format). Hands `engines` and `plan` a typed `Checkpoint` of linears and MLP blocks."""
