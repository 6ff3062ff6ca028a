"""The OSSEA (CloudStack) cloud backend: signing, client, plugin hook and an API simulator."""
