import time, statistics
from starflow_mlx.pipeline import Pipeline
p = Pipeline.from_pretrained()
p.text_to_video("a red square moving right")
t = {True: [], False: []}
for i in range(4):
    for s in (True, False):
        t0 = time.perf_counter(); r = p.text_to_video("a red square moving right", seed=i, stream_frames=s); t[s].append(time.perf_counter() - t0)
        if i == 0: print(s, {k: round(v, 3) for k, v in r.record["timings"].items()}, {k: v["passes"] for k, v in r.record["sampler"].items()})
print({k: round(statistics.median(v), 3) for k, v in t.items()})
