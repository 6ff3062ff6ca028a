// Command vcsim runs govmomi's vCenter simulator for OMA tests and benchmarks.
//
// It prints the SDK URL (https://127.0.0.1:PORT/sdk) as the first line of stdout and
// runs until SIGTERM or SIGINT, when it removes the model's temporary datastore
// directories and closes the server. Build it with ops/vcsim/build.sh.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (host:port, port 0 picks a free one)")
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	host := flag.Int("host", 3, "hosts per cluster")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	vm := flag.Int("vm", 2, "virtual machines per resource pool (cluster or standalone host)")
	pg := flag.Int("pg", 1, "distributed portgroups per datacenter")
	folder := flag.Int("folder", 0, "put each datacenter (and its vm/host/network/datastore folders) in a folder")
	ds := flag.Int("ds", 1, "datastores (mounted on every host)")
	username := flag.String("username", "", "accept only this user name (default: any non-empty)")
	password := flag.String("password", "", "accept only this password (with -username)")
	apiVersion := flag.String("api-version", "", "API version reported in AboutInfo (default 6.5)")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *host
	model.Host = *standalone
	model.Machine = *vm
	model.Portgroup = *pg
	model.Folder = *folder
	model.Datastore = *ds
	if *apiVersion != "" {
		model.ServiceContent.About.ApiVersion = *apiVersion
	}
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating model: %v", err)
	}

	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	model.Service.TLS = new(tls.Config)
	server := model.Service.NewServer()

	u := *server.URL
	u.User = nil // never print the credentials
	fmt.Println(u.String())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	sig := <-stop
	log.Printf("vcsim: %v received, stopping", sig)
	model.Remove()
	server.Close()
}
