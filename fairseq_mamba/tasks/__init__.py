from . import speech_enhancement  # noqa: F401  (registers the speech_enhancement task)
