"""DIAGNOSTIC (issue 19): dinotrain trained from the official code's initial weights of seed 0
(what `side-by-side.py` gives the official run) on its own batches of seed 0, evaluated by
side-by-side's one evaluation. With `side-by-side.py --official-batches` (the official code on
dinotrain's batches) the two runs share the initial weights and every crop and mask.

It writes a step-0 checkpoint holding the official initial student (= teacher), zero AdamW
moments and centers, into a fresh run folder (the layout from a finished seed-0 dinotrain run of
the same settings, TEMPLATE), and resumes dinotrain from it:

    python docs/parity-2026-12-04/dinotrain-from-official-init.py OFFICIAL_CHECKOUT DINOTRAIN_BIN \\
        TEMPLATE_RUN_DIR OUT_DIR
"""
import importlib.util, json, os, struct, subprocess, sys, zlib
import numpy as np
OFFICIAL, BIN, TEMPLATE, OUT = sys.argv[1:5]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
spec = importlib.util.spec_from_file_location("sbs", os.path.join(REPO, "tools/side-by-side.py"))
sbs = importlib.util.module_from_spec(spec); spec.loader.exec_module(sbs)
import argparse
args = argparse.Namespace(official=OFFICIAL, dinotrain=BIN, seeds=[0],
                          steps=600, eval_every=200, set=["student.patch_size=8", "student.drop_path_rate=0.1"],
                          out=OUT)
os.makedirs(args.out, exist_ok=True)
O = sbs.import_official(args.official)
O.torch.set_num_threads(os.cpu_count())
resolved = subprocess.run(sbs.dinotrain_args(args, 0, os.path.join(args.out, "print-config")) + ["--print-config"],
                          check=True, capture_output=True, text=True).stdout
cfg = sbs.official_cfg(O, resolved, args.steps)
O.fix_random_seeds(0)
model = O.SSLMetaArch(cfg)
init = {k: v.detach().numpy().astype(np.float32) for k, v in model.student.state_dict().items()}
run = os.path.join(args.out, "dinotrain-s0")
tmpl_path = os.path.join(TEMPLATE, "checkpoints", "step_00000200.safetensors")
b = open(tmpl_path, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); data = b[8 + n:]
meta = h.pop("__metadata__")
tensors = {}
for k, v in h.items():
    raw = data[v["data_offsets"][0]:v["data_offsets"][1]]
    dt = {"F32": np.float32, "I64": np.int64}[v["dtype"]]
    a = np.frombuffer(raw, dtype=dt).reshape(v["shape"]).copy()
    for p in ("student.", "teacher."):
        if k.startswith(p):
            src = init[k[len(p):]]
            assert src.shape == a.shape, (k, src.shape, a.shape)
            a = src.copy()
    if k.startswith(("exp_avg", "buffer.", "optim.")):
        a = np.zeros_like(a)
    tensors[k] = a
meta["position"] = json.dumps({"step": 0, "epoch": 0, "seed": 0, "images_in_epoch": 0}, separators=(",", ":"))
crc = 0
for k in sorted(tensors):
    crc = zlib.crc32(k.encode(), crc); crc = zlib.crc32(tensors[k].astype(tensors[k].dtype.newbyteorder("<")).tobytes(), crc)
meta["crc32"] = f"{crc:08x}"
os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
import shutil
shutil.copy(os.path.join(TEMPLATE, "config.yaml"), os.path.join(run, "config.yaml"))
from official_dinov2 import save_sorted
save_sorted(tensors, os.path.join(run, "checkpoints", "step_00000000.safetensors"), meta)
log = open(run + ".log", "w")
subprocess.run(sbs.dinotrain_args(args, 0, run) + ["--resume"], check=True, stdout=log, stderr=log)
evaluate = sbs.Evaluator(O, cfg, sbs.demo_data())
curve = {}
for step in (200, 400, 600):
    curve[step] = evaluate(sbs.dinotrain_teacher(os.path.join(run, "checkpoints", f"step_{step:08d}.safetensors")))
    print("dinotrain from the official init, step", step, curve[step], flush=True)
json.dump(curve, open(os.path.join(args.out, "curve.json"), "w"))
