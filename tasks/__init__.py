"""The toy world: synthetic tasks, a word-level tokenizer and tiny Llama teacher/student models."""
