"""Megatron-core training: the policy and critic trainers, log-probs, losses, advantages, checkpoints.

One trainer per rank (a plain multi-process gloo launch or a Ray actor):

    backend = select_backend("cpu")
    layout = init_distributed(backend, rank, world_size, "127.0.0.1", port, tensor_parallel_size=2)
    trainer = PolicyTrainer(TrainerConfig(hf_checkpoint=path, tensor_parallel_size=2, lr=1e-6), backend)
    trainer.snapshot("ref")                                      # host copy, swapped in on demand
    batch = TrainBatch.from_samples(samples, pad_token_id).split_for_dp(layout.dp_rank, layout.dp_size)
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
    batch.old_log_probs, _ = trainer.compute_log_probs(batch)     # or leave None: exactly on-policy
    metrics = trainer.train_step(batch)                          # one optimizer step over the global batch
    for bucket in trainer.hf_weight_buckets(256 << 20): ...      # HF-named full tensors (collective over TP)
    trainer.save(ckpt_root); trainer.load(ckpt_root); trainer.save_hf(folder)

Modules: config (TrainerConfig), actor (PolicyTrainer), critic (CriticTrainer), batch (TrainBatch,
micro-batching), losses / advantages (pure functions), log_probs (vocab-parallel reference formula),
checkpoint (atomic keep-last-N layout), distributed (init_distributed).
"""
