"""Adversarial post-training (Seaweed-APT) of the digits one-step student.

  python launch/train.py --config configs/digits_apt.py --workdir runs/apt \
      --config.teacher_workdir=runs/sft --config.generator_workdir=runs/det \
      --config.r1_mode=exact

`teacher_workdir` is the SFT run (D's backbone starts from it), and
`generator_workdir` the deterministic-distillation run (G starts from its EMA).
`r1_mode` is approx (the paper's), exact (`jax.grad`, weight lambda * sigma^2
unless r1_exact_weight >= 0) or none. Append ":tiny" for a seconds-long run.

Paper settings (image stage) and where this toy differs, and why (the measurements are in
docs/results.md#notes-on-the-apt-recipe):
  optimizer      RMSProp alpha 0.9, no clipping, no weight decay   (same)
  learning rate  5e-6 for G and D     here D 3e-4 (its fresh heads 3e-3), G 3e-5:
                                      with equal rates a prototype's D stayed at
                                      chance and G got worse; here G 6e-5 or 1e-4,
                                      D 1e-4 no better, D 3e-3 kept D at chance.
  D timesteps    shift(U(0, 1), 1)    here s < 1 (toward clean inputs): 8x8
                                      digits are destroyed by moderate noise,
                                      leaving D nothing to judge.
  loss           non-saturating       here AAPT's relativistic pairing: with
                                      the non-saturating loss D's logits swing
                                      together for real and fake and G got worse.
  batch, EMA     9062, 0.995          128 (the whole set is 1,797 images), 0.995.
  R1             lambda 100, sigma 0.01 (same)
  updates        350                  400 (launch/demo.py runs 100 to fit in 10
                                      minutes). D leaves chance only after ~200
                                      updates; the distance passes the teacher's
                                      at ~400.
"""

from apt_jax.train.config import base_config, model_config, rmsprop_config


def get_config(variant: str = ""):
    c = base_config()
    c.task = "apt"
    c.teacher_workdir = ""
    c.generator_workdir = ""
    c.model = model_config("digits")  # must equal both runs'
    del c["optimizer"]  # one per role instead
    c.generator_optimizer = rmsprop_config(3e-5)
    c.discriminator_optimizer = rmsprop_config(3e-4)
    # The fresh heads learn at 10x the teacher-initialised backbone's rate.
    c.discriminator_optimizer.head_lr_multiplier = 10.0
    c.ema_decay = 0.995
    c.ema_warmup = True

    # Losses (apt_jax.objectives.apt): relativistic, R1 on real samples.
    c.loss = "relativistic"  # or "nonsaturating" (the paper's), "wgan_gp"
    c.r1_mode = "approx"  # or "exact", "none"
    c.r2_mode = "none"  # the same penalty on generated samples (AAPT)
    c.r1_weight = 100.0  # lambda of the approximate penalty
    c.r1_sigma = 0.01
    c.r1_exact_weight = -1.0  # < 0: lambda * sigma^2, so both modes regularise alike
    c.gp_weight = 10.0
    c.d_timestep_shift = 0.3
    c.d_head_layers = ()  # () -> default_head_layers(depth)

    # D alone against the frozen student for this many of the total_steps first.
    c.discriminator_warmup_steps = 0
    c.total_steps = 400
    c.batch_size = 128
    c.checkpoint_every = 100
    c.log_every = 25

    c.eval.num_samples = 1000
    c.eval.steps = 1
    c.eval.cfg_scale = 1.0

    if variant == "tiny":
        c.total_steps = 4
        c.batch_size = 16
        c.checkpoint_every = 2
        c.log_every = 2
        c.model = model_config("digits-tiny")
        c.eval.num_samples = 20
        c.eval.grid_rows = 2
        c.progress_bar = False
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of digits_apt; use '' or 'tiny'.")
    return c
