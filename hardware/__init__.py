"""Hardware targets and the cost model: sourced specs as data (`specs/*.yaml` → `spec`), the
resolved `Target` (`target`), per-op kernels of a graph (`opcost`), the roofline-times-efficiency
model and its calibration (`costmodel`, `calibrate`), the capability matrix (`capability`), LLM
phases and parallelism (`llm`, `llm_shape`, `parallel`), the FPGA instruction model (`fpga`),
plots. Estimates are pure functions of (kernels, spec, calibration); `cpu_probe` is the one
module that measures this machine, and the driver calls it.

May import: `optim`'s bottom layer (errors, ir, ops, kernels); never `passes`, `backends`,
`optim.zoo` or the driver.
"""
