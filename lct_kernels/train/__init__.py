"""lct_kernels.train: a thin sLCT / iCT trainer built on the public ops.

Modules (one job each):
    config       dataclass config, presets, TOML/YAML files, dotted overrides, validation
    data         the embedded digits data, latent files, image folders + a local VAE, latent stats
    autoencoder  the small KL autoencoder that turns digits into latents (and back)
    model        DiT with adaLN-zero, NsLN qk-norm and fused NsLN + modulate
    objective    iCT / sLCT pieces as small pure functions (sigma grid, sampler, curriculum, c, ...)
    sampling     1- and 2-step consistency sampling, sigma_mid search
    checkpoint   atomic checkpoints, keep-last-k, clear errors on corrupt files
    loop         the training loop (owns no math)
    cli          lct-train and lct-sample
"""
