# The hyfhe image from a binary built on the host, for machines without a registry
# (deploy/local-images.sh): the Dockerfile's runtime stage, built on the debootstrap base, plus
# the binary. Context: a folder holding `hyfhe`.
ARG RUNTIME=hyfhe-runtime:bookworm
FROM ${RUNTIME}
COPY hyfhe /usr/local/bin/hyfhe
