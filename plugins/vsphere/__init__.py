"""vSphere inventory source (pyvmomi): `VSphereSource` reads VMs, disks and NICs from vCenter."""
from oma.plugins.vsphere.source import (VCenterAuthError, VCenterConnection, VCenterError,
                                    VCenterUnreachable, VSphereSource)

__all__ = ["VCenterAuthError", "VCenterConnection", "VCenterError", "VCenterUnreachable", "VSphereSource"]
