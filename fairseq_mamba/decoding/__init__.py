"""CTC decoding: Viterbi and beam search with a letter n-gram LM (``python -m fairseq_mamba.decoding.decode``)."""
