"""Bring your own recordings: a folder of audio plus transcripts -> the corpus layout stage 01 reads.

``layouts`` pairs audio files with transcripts (LibriSpeech ``*.trans.txt``, a list file, one
``.txt`` per file), ``text`` normalises them to the letter dictionary, ``audio`` converts to
16 kHz mono FLAC, ``split`` assigns train/valid/test, ``corpus`` runs it all
(``python -m fairseq_mamba.prepare``, ``run_scripts/00_prepare.sh``).
"""
