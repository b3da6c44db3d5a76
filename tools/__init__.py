"""Development tools for this Cog project (not shipped in the container's runtime path)."""
