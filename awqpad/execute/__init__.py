"""Stage 5, execute: doing the plan (bounded tensor I/O, the streaming shard writer, the atomic output repo
with config, index, model card and awqpad.json). Hands `verify` a finished OUT directory."""
