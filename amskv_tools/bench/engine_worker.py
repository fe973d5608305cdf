"""One engine in its own process, for ``engine_cpu.py``: loads the code found in a given source tree (this one,
or an older commit's exported tree) and times ``Engine.generate`` on request.

    python engine_worker.py TREE SPEC_JSON    then, on stdin, one "run" per timed batch and "quit"

Only the standard library is imported before TREE goes first on sys.path, so ``amskv`` comes from TREE
(the editable install's finder runs after sys.path). Every reply is one JSON line on stdout.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any


def main(tree: str, spec: dict) -> None:
    sys.path.insert(0, tree)
    import torch

    import amskv
    from amskv.config import VARConfig, VQVAEConfig
    from amskv.engine import Engine
    from amskv.kvcache.policy import make_policy
    from amskv.model.var import VAR
    from amskv.model.vqvae import VQVAE
    from amskv.sampling import SamplingParams

    torch.set_num_threads(spec["threads"])

    def config(cls: type, fields: dict) -> Any:  # JSON turned the tuples into lists
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    var_cfg, vae_cfg = config(VARConfig, spec["var"]), config(VQVAEConfig, spec["vae"])
    var, vae = VAR(var_cfg).eval(), VQVAE(vae_cfg).eval()
    state = torch.load(spec["weights"])
    var.load_state_dict(state["var"])
    vae.load_state_dict(state["vae"])
    del state
    # the old engine has no batch_invariant argument (it always ran fixed tiles)
    extra = {} if spec["mode"] is None else {"batch_invariant": spec["mode"]}
    engine = Engine(var, vae, make_policy(spec["policy"], var_cfg.patch_nums), torch.float32,
                    torch.device("cpu"), **extra)
    batch = spec["batch"]
    labels, seeds = [(37 * i) % var_cfg.num_classes for i in range(batch)], list(range(batch))
    params = SamplingParams(cfg=spec["cfg"], top_k=spec["top_k"], top_p=spec["top_p"])
    engine.generate(labels[:1], seeds[:1], params)  # warm-up
    invariance = getattr(engine, "invariance", None)
    print(json.dumps({"ready": True, "amskv": amskv.__file__,
                      "invariance": "fixed 64-row tiles (old engine)" if invariance is None
                      else invariance.describe(),
                      "invariance_check_s": None if invariance is None else invariance.seconds}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        began = time.perf_counter()
        res = engine.generate(labels, seeds, params)
        total = time.perf_counter() - began
        digest = hashlib.sha256(res.images.numpy().tobytes()).hexdigest()[:16]
        print(json.dumps({"total_s": total, "ar_s": res.seconds_ar, "decode_s": res.seconds_decode,
                          "images_sha256": digest}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
