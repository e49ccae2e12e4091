"""The dataset on disk: its layout, the stores it lives in, clip files, shards, exports, the card, the run record
and the lease. No Beam; imports only pipeline.core."""
