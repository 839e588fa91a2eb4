from fairseq_mamba.prepare.corpus import main

main()
