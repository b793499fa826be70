import numpy as np, tempfile, pathlib
from starflow_mlx import media, cli
d = pathlib.Path(tempfile.mkdtemp())
res=[]; orig=cli._sample
frames_written=[]
w0 = media.VideoWriter.write
def w(self, f): frames_written.append(np.array(f)); w0(self, f)
media.VideoWriter.write = w
cli._sample = lambda *a, **k: res.append(orig(*a, **k)) or res[-1]
assert cli.main(["generate", "a red square moving right", "--out", str(d/"clip.mp4"), "--frames", "9", "--no-denoise", "--seed", "3"]) == 0
r = res[0]
print("written==result", np.array_equal(np.stack(frames_written), r.frames[0]))
n = len(frames_written)
at_end = media.write_video(d/"end.mp4", r.frames[0], 8, r.record)
print(n, (d/"clip.mp4").read_bytes() == at_end.read_bytes())
