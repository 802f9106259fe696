"""gpumesh's Raft layer on top of pysyncobj: the node and its tick thread (`node`), the
member list kept beside the journal (`members`), errors (`errors`), and the pysyncobj
internals it relies on (`internals`)."""
