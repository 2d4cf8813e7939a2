"""The ComfyUI-bound engine under the nodes: tap capture (:mod:`.capture`), model families and tap
paths (:mod:`.families`), per-seed noise (:mod:`.noise`), split sampling (:mod:`.split_sampling`)."""
