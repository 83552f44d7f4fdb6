"""Where training measurements go: metrics.jsonl (always), TensorBoard, the terminal."""
