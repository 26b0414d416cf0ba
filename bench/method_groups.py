"""The variants `bench/method_switches.py` trains: each group's reference and the switches each variant changes.

A variant is a dict of TrainConfig fields plus the keys below that are not TrainConfig's: the model's
(``MODEL_KEYS``), the front end's training-time masks (``NOISE_KEYS``) and the student's data and start
(``STUDENT_KEYS``); ``mode: distill`` variants need a pseudo-label folder (``--pseudo``).
"""

# the chain's student: distilled, started from the best-ranked teacher (student.init = teacher)
WARM = {"mode": "distill", "init": "teacher"}

# group -> (reference variant, variants); a variant is the TrainConfig / model overrides it changes
GROUPS = {
    "head": (
        "bn, spread 1.0 (reference)",
        {
            "bn, spread 1.0 (reference)": {"head": "bn", "head_bn_weight": 1.0},
            "bn, spread 0.25": {"head": "bn", "head_bn_weight": 0.25},
            "bn, spread 0.1": {"head": "bn", "head_bn_weight": 0.1},
            "linear": {"head": "linear"},
        },
    ),
    "bn_stats": (
        "DANN, both domains",
        {
            "DANN, both domains": {"mode": "dann", "bn_stats": "both"},
            "DANN, source only": {"mode": "dann", "bn_stats": "source"},
        },
    ),
    "adv_scale": (
        "supervised",
        {
            "supervised": {},
            "DANN 0.03": {"mode": "dann", "adv_scale": 0.03},
            "DANN 0.1": {"mode": "dann", "adv_scale": 0.1},
            "DANN 0.3": {"mode": "dann", "adv_scale": 0.3},
        },
    ),
    "peak": ("level as recorded", {"level as recorded": {}, "peak-normalised": {"peak_normalize": True}}),
    "band_floor": (
        "bands floored at 1e-4",
        {
            "bands floored at 1e-4": {},
            "floor 0.1 x median": {"band_floor": 0.1},
            "DANN, floor 1e-4": {"mode": "dann"},
            "DANN, floor 0.1 x median": {"mode": "dann", "band_floor": 0.1},
        },
    ),
    "student": (
        "student, uniform",
        {
            "source only": {},
            "student, uniform": {"mode": "distill"},
            "student, spread-weighted": {"mode": "distill", "weighting": "spread"},
        },
    ),
    "select_on": (
        "student, best epoch by r",
        {
            "student, best epoch by r": {"mode": "distill"},
            "student, best epoch by loss": {"mode": "distill", "select_on": "loss"},
            "source only, best epoch by r": {},
            "source only, best epoch by loss": {"select_on": "loss"},
        },
    ),
    "student_init": (
        "student, from scratch",
        {
            "student, from scratch": {"mode": "distill"},
            "student, from the best teacher": WARM,
            "student, from the best teacher, lr / 4": {**WARM, "lr": 5e-4},
        },
    ),
    "student_noise": (
        "student, from the best teacher",
        {
            "student, from the best teacher": WARM,
            "noised: masks of 20 bands, 50 frames": {
                **WARM,
                "freq_mask": 20,
                "time_mask": 50,
            },
            "noised: masks of 40 bands, 100 frames": {
                **WARM,
                "freq_mask": 40,
                "time_mask": 100,
            },
        },
    ),
    "source_soft": (
        "teacher ensemble (the teachers' mean, not trained)",
        {
            "teacher ensemble (the teachers' mean, not trained)": {"mode": "distill", "ensemble_only": True},
            "student, from the best teacher": WARM,
            "student, source labels + 0.5 ensemble": {**WARM, "source_soft": 0.5},
            "student, source labels + 0.3 ensemble": {**WARM, "source_soft": 0.3},
        },
    ),
    "student_epochs": (
        "student, from the best teacher",
        {
            "student, from the best teacher": WARM,
            "the same, 16 epochs": {
                **WARM,
                "max_epochs": 16,
                "patience": 8,
                "lr_milestones": (8, 12),
            },
        },
    ),
    "student_average": (
        "student, from the best teacher",
        {
            "student, from the best teacher": WARM,
            "the same, its last epoch (no selection)": {**WARM, "average": 1},
            "the same, mean weights of its last 3 epochs": {**WARM, "average": 3},
            "the same, mean weights of its last 5 epochs": {**WARM, "average": 5},
        },
    ),
    "student_shifted": (
        "student, from the best teacher",
        {
            "student, from the best teacher": WARM,
            "the same + windows 7.5 s into each segment pair": {**WARM, "shifts": 1},
            "the same + windows 5 and 10 s into each pair": {**WARM, "shifts": 2},
        },
    ),
    "student_adversary": (
        "student, from the best teacher, paired",
        {
            "student, from the best teacher": WARM,
            "student, from the best teacher, paired": {**WARM, "mix": "paired"},
            "the same + domain head, adversarial weight 0.1": {
                **WARM,
                "mix": "paired",
                "adversary": True,
                "adv_scale": 0.1,
            },
            "the same + domain head, adversarial weight 0.3": {
                **WARM,
                "mix": "paired",
                "adversary": True,
                "adv_scale": 0.3,
            },
        },
    ),
    "student_calibrate": (
        "student, from the best teacher",
        {
            "student, from the best teacher": WARM,
            "teacher ensemble (the teachers' mean, not trained)": {"mode": "distill", "ensemble_only": True},
            "the same, raw outputs (no calibration on the validation split)": {
                **WARM,
                "calibrate": "none",
            },
        },
    ),
    "calibrate": (
        "supervised, raw outputs",
        {
            "supervised, raw outputs": {"calibrate": "none"},
            "supervised, calibrated": {"calibrate": "affine"},
            "DANN, raw outputs": {"mode": "dann", "calibrate": "none"},
            "DANN, calibrated": {"mode": "dann", "calibrate": "affine"},
        },
    ),
    "student_mix": (
        "student, pooled",
        {
            "student, pooled": {"mode": "distill"},
            "student, paired": {"mode": "distill", "mix": "paired"},
        },
    ),
}
MODEL_KEYS = {"head", "head_bn_weight", "width"}
NOISE_KEYS = {"freq_mask", "time_mask"}  # the model's frontend: training-time spectrogram masks
STUDENT_KEYS = {"weighting", "mix", "init", "source_soft", "ensemble_only", "average", "shifts", "adversary"}
NOT_TRAIN_KEYS = MODEL_KEYS | NOISE_KEYS | STUDENT_KEYS | {"peak_normalize", "band_floor"}
