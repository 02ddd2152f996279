"""The quickstart: a tiny model learns two-digit + one-digit addition with SFT then GRPO, on CPU."""
