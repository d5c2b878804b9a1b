"""Loopback stand-ins for sandbox services that cannot run here, each following its vendor's
published contract (see each module's docstring for the pages it follows)."""
