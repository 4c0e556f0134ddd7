"""The tiny shapes demo: a synthetic image-question-answer task and the model shipped for it."""
