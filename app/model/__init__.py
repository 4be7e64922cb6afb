"""The plain model (GPT in the Llama layout) and its export format."""
