//! What mskdns learns from AWS at run time: MSK clusters (ListClustersV2, GetBootstrapBrokers)
//! and VPC endpoint addresses and subnet AZs (EC2).

pub mod ec2;
pub mod msk;
