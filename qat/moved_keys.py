"""Config keys that were renamed: an old key on the command line fails with the new name, before Hydra runs."""
LOSS_KEYS = ("kind", "temperature", "hard_weight", "mse_alpha", "mse_layers", "token_match", "project",
             "two_head_alpha")
MOVED = {
    "kd.model": "kd.teacher.model",
    "kd.quant": "kd.teacher.quant",
    "kd.checkpoint": "kd.teacher.checkpoint",
    "trainer.compile": "compile",
    "quant.attn.probs_signed": "quant.attn.signed",
    **{f"kd.{k}": f"kd.loss.{k}" for k in LOSS_KEYS},
}


def _key(arg: str) -> str:
    """The config key an override sets: '+quant@kd.quant=w4a4' -> 'kd.quant', 'kd.mse_alpha=2' -> 'kd.mse_alpha'."""
    key = arg.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[1] if "@" in key else key


def check(argv: list[str]) -> None:
    """Raise ValueError naming the new key for the first override that sets a renamed key."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key = _key(arg)
        for old, new in MOVED.items():
            if key == old or key.startswith(old + "."):
                fixed = arg.replace(old, new, 1)
                raise ValueError(f"{old} was renamed to {new}: write {fixed}")
