"""Does RPO learn what its preferences say? A miniature reproduction with ground-truth judges, over worlds.

The worlds (:mod:`bench.reproduction.world`, described in ``bench/REPRODUCTION.md``): English
requests from topics in groups; the judge scores a reply by relevance and by two rules of the
prompt's group that only the preferences teach. World 0 is the hand-built one; the others are
drawn from a seed (groups, topics, words, the base policy's habit, the label noise), so a
conclusion has to hold in worlds nobody tuned. For every world, one command runs it all through
the real pipeline:

1. the world's files (the preferences drawn anew for every seed), checked as world 0 was (the
   base policy's habits wrong in every group, labels agreeing with the judge at the rate the
   temperature states, held-out prompts new wordings); a sentencepiece tokenizer, a random tiny
   Llama (HF), HF -> Megatron conversion, preprocessing (paired, unpaired, warm-up corpus) and
   all-MiniLM-L6-v2 prompt embeddings;
2. a supervised warm-up on the base policy's replies (``python -m megatron_rpo.train``, sft);
3. from that same start, every method, every learning rate of one grid, every seed: DPO, RPO paired
   with embedding / uniform weights (rows summing to 1, and rows averaging 1), RPO unpaired, KTO
   on the same unpaired items, IPO and SimPO (diagonal weights and SimPO+RPO on request); each a
   ``torchrun -m megatron_rpo.train`` run (the warm-up is the online reference) exported back to
   Hugging Face; two runs at a time on CPU, one process each;
4. in the first world only, the batch-size study for RPO with embedding weights and rows
   averaging 1 at its chosen learning rate: the contrast matrix over 2, 4 and 8 pairs per rank with
   8 pairs per step, and 2 data-parallel ranks of 4 pairs each, their matrix gathered (8 x 8) or
   kept per rank (``contrast_scope: local``, 4 x 4);
5. evaluation with transformers on held-out prompts (their exact wording never trained on): the
   judge's win rate of each model's greedy reply against the warm-up's (ties count half), the
   judge's mean reward, how often each group rule is followed, how many replies keep the world's
   shape, and the held-out preference ranking accuracy (pairs labelled by the judge without
   noise; a pair is ranked right when the model's log-ratio against the warm-up is larger for the
   better reply);
6. ``results.md`` (pooled tables over worlds and seeds, collapse rates, per-world tables),
   ``reproduction.png`` and ``results.json`` in the run folder.

Tuning, the same for every method: the learning rate is chosen per method *and world* from one
grid by the mean judge reward on that world's *validation* prompts (separate from the test prompts
the tables report), averaged over seeds; steps, batch, beta (0.1; SimPO 2.0 with gamma 0.5), the
optimizer and the seeds are fixed. Contrast weights use the paper's defaults (tau 0.5 paired,
0.75 unpaired; alpha 0.8; rows summing to 1). A run *collapses* when fewer than half of its greedy
test replies keep the world's shape; collapse is counted per method and learning rate, not
averaged away. A seed draws the preference data and orders it; the warm-up is shared in a world.

    python -m bench.reproduction                 # 6 worlds x 4 seeds, about 80 minutes on 2 CPU cores
    python -m bench.reproduction --worlds 2 --seeds 2
    python -m bench.reproduction --quick         # the harness end to end (2 worlds) in about 2 minutes
    python -m bench.reproduction --gpu           # a larger model and budget on CUDA
(from the repository's root). The package: :mod:`~bench.reproduction.world` (the worlds and their
judge), :mod:`~bench.reproduction.experiment` (the methods, the scales, the pipeline and one world's
runs), :mod:`~bench.reproduction.evaluation` (transformers, independent of the trainer) and
:mod:`~bench.reproduction.report` (tables, the figure, results.json); ``__main__`` is the command.
"""
