// Command etcd is a thin wrapper around etcd's own entry point, so that etcd is
// built at exactly the version k8s.io/kubernetes pins in its go.mod.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
