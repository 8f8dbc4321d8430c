"""mlxtune eval: answer test prompts with a server or a local model, score, compare two."""
