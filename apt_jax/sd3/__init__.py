"""The torch side of a diffusers SD3 pipeline folder: images and captions in, latents out, and back.

Only `launch/encode.py` and `launch/decode.py` (and their tests) import this
package; nothing else in apt_jax does, so training, sampling and the library
never need PyTorch. Its networks run in torch (`pip install -r
requirements-encode.txt`), imported inside the functions that run them: every
check of a folder, a CSV or an image runs, and fails with a message naming the
file and the fix, before torch is imported or a model is loaded.

    pipeline  the folder's configs checked; its VAE and text encoders, loaded and run
    encode    a folder of images + metadata.csv -> the latents dataset
    decode    a samples .npz -> PNG files and a grid
"""
