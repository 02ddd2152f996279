"""The JAX trainer family (`--train-backend jax`; the only one of some backends, a second one of others):
the policy trainer of slime.training.actor rebuilt on JAX + optax over one device mesh.

    trainer = JaxPolicyTrainer(TrainerConfig(hf_checkpoint=path, tensor_parallel_size=2), backend.jax_devices())
    trainer.snapshot("ref")
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")   # the whole global batch: DP is in the mesh
    metrics = trainer.train_step(batch)
    for bucket in trainer.hf_weight_buckets(256 << 20): ...           # HF-named torch tensors for the engines
    trainer.save(root); trainer.load(root); trainer.save_hf(folder)

Modules: trainer (JaxPolicyTrainer), step (batch padding, log-probs, losses, LR schedule), losses (the RL maths,
same cases as the torch ones), sharding (mesh and partition rules), state (checkpoint files), worker (the Ray
actor TrainerGroup drives). The model itself is slime.models.jax_dense.
"""
