"""`gptrain bench`: the training-speed ladder (gptrain.bench.cli), its rungs (ladder), the MFU
peak (peak), running it (run) and its table and chart (report)."""
