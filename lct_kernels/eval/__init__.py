"""lct_kernels.eval: evaluation of trained models (built on lct_kernels.train, never
imported by the trainer's core; ``lct_kernels.train.cli`` joins the two).

Modules:
    metrics           Fréchet distance, precision/recall, sliced Wasserstein, class histograms
    digit_classifier  the small CNN whose features the digits metrics use
    evaluate          lct-eval (digits offline; FID on real data) and the trainer's
                      periodic evaluation callback (PeriodicDigitsEval)
    ablation          lct-ablate: the sLCT components added one at a time
"""
