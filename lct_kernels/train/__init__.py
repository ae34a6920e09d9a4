"""lct_kernels.train: a thin sLCT / iCT trainer built on the public ops.

Modules (one job each):
    config       dataclass config, presets, TOML/YAML files, dotted overrides, validation
    objective    iCT / sLCT pieces as small pure functions (sigma grid, sampler, curriculum, c, ...)
    model        DiT with adaLN-zero, NsLN qk-norm and fused NsLN + modulate
    sampling     1- and 2-step consistency sampling, sigma_mid search
    pipeline     a run's pieces from its config: latents, decoder, model
    loop         the training loop (owns no math; periodic evaluation is a callback)
    checkpoint   atomic checkpoints, keep-last-k, clear errors on corrupt files
    distributed  torchrun / DDP set-up and helpers
    plots        image grids and the loss plot
    cli          lct-train, lct-sample, lct-eval, lct-ablate (the one place that joins
                 the trainer with lct_kernels.eval)
    data/        the latent sources: digits (+ its autoencoder), latent files,
                 image folders + a local VAE, latent stats

Evaluation (metrics, the digit classifier, lct-eval's reports, the ablation) lives
in :mod:`lct_kernels.eval`, which imports the trainer; the trainer's modules other
than ``cli`` never import it.
"""
