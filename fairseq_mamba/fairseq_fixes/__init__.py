"""Fixes to fairseq 0.12 at run time, applied by importing the plugin: checkpoint loading under torch >= 2.6,
``hubert_ctc``'s missing config field, torchaudio stubs for the upstream scripts (``upstream``), exact resume."""
